"""The compiler: a trained model -> an artifact the accelerator (and the golden model) runs.

``python -m sw.compile CHECKPOINT --board ulx3s -o MODEL`` compiles a training checkpoint and
prints a per-layer report. From Python::

    from sw.compile import compile_model, golden, load
    artifact = compile_model(model, config, calibration=images, preprocessing=info,
                             class_names=names)
    logits = golden.run(artifact, raw_images)

See ``docs/compiler.md`` (the program, its integer semantics, the fixed-point formats and the
memory plan) and ``docs/artifact.md`` (the file format).
"""

from . import golden
from .artifact import (
    Artifact,
    ArtifactError,
    CorruptArtifactError,
    IncompatibleArtifactError,
    TruncatedArtifactError,
    VersionMismatchError,
    load,
    save,
)
from .compiler import compile_checkpoint, compile_model
from .lower import CompileError, lower

__all__ = [
    "Artifact", "ArtifactError", "CompileError", "CorruptArtifactError",
    "IncompatibleArtifactError", "TruncatedArtifactError", "VersionMismatchError",
    "compile_checkpoint", "compile_model", "golden", "load", "lower", "save",
]
