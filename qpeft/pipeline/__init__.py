"""Pipeline stages that turn a base model into a qpeft checkpoint."""
