"""The documents stage: message kinds, matching, and the MongoDB document each tweet becomes."""
