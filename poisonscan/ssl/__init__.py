"""poisonscan.ssl"""
