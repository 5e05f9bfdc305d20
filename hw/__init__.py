"""Amaranth HDL generator for the binary neural network accelerator."""
