"""Tests of distalign.shift (density ratios for DoRA) and the `distalign shift` command."""
