from pathlib import Path

STATS_DIR = Path("data/stats")
