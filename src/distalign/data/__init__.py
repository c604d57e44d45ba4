"""distalign.data"""
