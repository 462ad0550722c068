"""End-of-turn judges: has the speaker finished, judged from the audio of the turn so far."""
