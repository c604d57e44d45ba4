"""distalign.tasks"""
