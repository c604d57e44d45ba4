"""distalign.train"""
