"""Signal work (plain NumPy/SciPy functions) and the thin Beam wrappers around it."""
