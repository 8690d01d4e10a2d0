"""What a run leaves behind: results.json, the card, figures, what a push sends."""
