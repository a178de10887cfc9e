"""megalm: 3D-parallel GPT training composed through one explicit Topology."""

__version__ = "0.1.0"
