"""What comes in and goes out: datasets (data.py), models and processors (models.py), where they come from
(sources.py), sparse checkpoints (checkpoint.py; their record's schema is cap_hf/record.py), the Hub (hub.py), charts (plots.py)."""
