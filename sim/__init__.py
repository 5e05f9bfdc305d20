"""Simulation: a behavioural device model and (later) cocotb testbenches of the hardware."""
