"""distalign.shift"""
