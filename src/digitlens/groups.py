"""The one definition of the digit groups of the binary task (seed 002): is the digit in {1, 2, 4, 6, 9}?"""

#: The two groups, positive group first.
DIGIT_GROUPS: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 2, 4, 6, 9), (0, 3, 5, 7, 8))
GROUP_POSITIVE, GROUP_NEGATIVE = DIGIT_GROUPS
#: Names of the groups, in the order of :data:`DIGIT_GROUPS`.
GROUP_NAMES = ("in {1, 2, 4, 6, 9}", "in {0, 3, 5, 7, 8}")
