"""distalign.models"""
