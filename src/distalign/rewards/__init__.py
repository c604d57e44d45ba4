"""distalign.rewards"""
