"""How the single-device model is spread over devices: process groups, tensor and expert parallel."""
