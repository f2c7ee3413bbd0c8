"""What comes in and goes out: datasets (data.py), models and processors (models.py), where they come from
(sources.py), sparse checkpoints and their records (checkpoint.py, record.py), the Hub (hub.py), charts (plots.py)."""
