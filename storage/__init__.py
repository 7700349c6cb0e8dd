"""The rollout store: SQLAlchemy 2 async models, repositories, migrations, redaction, retention, purge."""
