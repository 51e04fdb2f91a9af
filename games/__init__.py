"""Marketing games (wheel, scratch card, egg smash) on the shop's hot-path machinery."""
