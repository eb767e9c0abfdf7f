"""What a process asks of its host: files written atomically and privately, freed memory handed back, and the
crash points tests kill the aggregator at."""
