"""The classes of the built-in synthetic set (`har_jax.data.prepare.synthetic_actions`), known to
evaluation without the generator: five pairs of classes that differ only in temporal order."""

CLASS_NAMES = (
    'move_left', 'move_right',
    'move_up', 'move_down',
    'grow', 'shrink',
    'orbit_clockwise', 'orbit_counterclockwise',
    'brighten', 'darken',
)
REVERSAL_PAIRS = [(2 * p, 2 * p + 1) for p in range(len(CLASS_NAMES) // 2)]
