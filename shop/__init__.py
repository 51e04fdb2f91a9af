"""Private-domain mini-program store backend."""
