"""Statistics of samples and rewards that training and evaluation both compute: win rates with
bootstrap intervals, KL estimates, text diversity, and first-order dominance between two reward
distributions. Pure functions of arrays and texts; nothing here loads a model or reads a run."""
