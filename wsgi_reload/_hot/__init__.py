"""In-place patches: which edits can go into running code, and gunicorn's patch transport."""
