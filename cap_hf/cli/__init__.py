"""What only the scripts use: argument parsing (parser.py: HfArgumentParser with --recipe, clear errors) and the
offline demo of scripts/prune.py (demo.py), a backbone's evaluation flags (backbone.py)."""
