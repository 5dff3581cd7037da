"""AlphaZero-style self-play: games from pgx, search from mctx, a Flax policy-value net."""
