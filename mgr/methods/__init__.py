"""The methods under study (approximation, partial updates, block-update schedules, ...), kept apart from the
harness that measures them: a method module may use the harness, never the other way round."""
