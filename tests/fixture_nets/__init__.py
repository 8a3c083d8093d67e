"""Tiny networks written the way other code bases write theirs, for the run-format tests. The tests put this
package's parent folder on the Python path through run.json's `python_path` (`--code-dir tests`), the way a
user points the search at their own code base, so Ray workers import it the same way."""
