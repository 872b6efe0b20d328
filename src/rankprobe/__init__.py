"""RankProbe: does an optimizer or a normalisation make attention keys collapse into few dimensions?"""

__version__ = "0.1.0"
