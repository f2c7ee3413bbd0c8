"""Model-card templates and the code that fills them (built in the checkpoint/Hub issue)."""
