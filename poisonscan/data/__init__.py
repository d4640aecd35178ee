"""poisonscan.data"""
