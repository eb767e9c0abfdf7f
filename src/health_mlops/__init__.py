"""Health MLOps: hospitals train one health-risk model together without moving patient records."""

__version__ = "0.1.0"
