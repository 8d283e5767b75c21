"""nbgrader configuration of the course (nbgrader 0.9.6).

The repository root is the course root: the instructor's notebooks (with solutions and
hidden tests) are ``solutions/<assignment>/<assignment>.ipynb``, written by
``tools/build_exercises.py``; ``nbgrader generate_assignment <assignment> --no-db`` releases
them into ``notebooks/<assignment>/`` (run ``tools/build_exercises.py --release`` for all).
"""

import os

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"

# The body of every solution region becomes exactly this line in the released notebook.
c.ClearSolutions.code_stub = {"python": "raise NotImplementedError"}
c.ClearSolutions.begin_solution_delimeter = "BEGIN SOLUTION"
c.ClearSolutions.end_solution_delimeter = "END SOLUTION"

# Hidden tests: the text between these markers is removed from the released test cells
# (nbgrader's defaults, stated here so that the notebooks and this file agree).
c.ClearHiddenTests.begin_test_delimeter = "BEGIN HIDDEN TESTS"
c.ClearHiddenTests.end_test_delimeter = "END HIDDEN TESTS"

# Autograding: put back any graded (test) cell a learner deleted, and stop a notebook that
# runs too long (the slowest hidden case takes well under a second).
c.OverwriteCells.add_missing_cells = True
c.Execute.timeout = 120

# `nbgrader zip_collect`: files downloaded from a learning platform go in
# downloaded/<assignment>/archive/ (loose or in .zip archives), each named
# "<student id>__<notebook file name>", e.g. "jsmith__02_queries_keys_values.ipynb".
c.FileNameCollectorPlugin.named_regexp = r".*/(?P<student_id>[^/]+?)__(?P<file_id>[^/]+)$"  # matched on the whole path
