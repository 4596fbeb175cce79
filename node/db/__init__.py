"""Job state: the SQLAlchemy models, sessions and the one place where job states change."""
