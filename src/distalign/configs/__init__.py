"""Config sections owned by the online loop and the evaluation commands (assembled in ``distalign.config``)."""
