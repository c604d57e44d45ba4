"""distalign.eval"""
