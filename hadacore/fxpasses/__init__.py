"""fxpasses"""
