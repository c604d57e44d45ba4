"""distalign.targets"""
