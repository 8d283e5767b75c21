"""nbgrader configuration of the course (nbgrader 0.9.6).

The repository root is the course root: the instructor's notebooks (with solutions and
hidden tests) are ``solutions/<assignment>/<assignment>.ipynb``, written by
``tools/build_exercises.py``. ``nbgrader generate_assignment <assignment>`` releases them into
``notebooks/<assignment>/`` and records the assignment (notebooks, grade cells, points, test
cells with their hidden tests) in ``gradebook.db``, which ``nbgrader autograde`` and
``attnlib grade-class --gradebook`` need; ``--no-db`` writes the same notebooks and no
gradebook (what ``make release``, i.e. ``tools/build_exercises.py --release``, does for the
repository). A course folder elsewhere needs this file and ``solutions/<assignment>/``.
"""

import importlib.util
import os
import warnings

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

# Autograding: put back any graded (test) cell a learner deleted, and stop a cell that runs
# too long: as long as `attnlib grade` gives a whole notebook (DEFAULT_TIMEOUT in
# attnlib/grading/protocol.py; a test checks they agree). Each case has its own limit besides,
# which the test cells apply (`check()`).
c.OverwriteCells.add_missing_cells = True
c.Execute.timeout = 300

# `nbgrader zip_collect`: files downloaded from a learning platform go in
# downloaded/<assignment>/archive/ (loose or in .zip archives), each named
# "<student id>__<notebook file name>", e.g. "jsmith__02_queries_keys_values.ipynb".
c.FileNameCollectorPlugin.named_regexp = r".*/(?P<student_id>[^/]+?)__(?P<file_id>[^/]+)$"  # matched on the whole path

# `nbgrader autograde`: nbgrader's sanitizing steps, its OverwriteCells replaced by attnlib's,
# which does the same but does not report a test cell as changed ("Attribute 'checksum' for
# cell ... has changed!") when it is exactly the released cell: nbgrader records the cell with
# its hidden tests and releases it without them, so its own check flags every such cell
# (nbgrader issue #1961) while it puts the hidden tests back. Edited cells are still reported.
c.Autograde.sanitize_preprocessors = [
    "nbgrader.preprocessors.ClearOutput",
    "nbgrader.preprocessors.DeduplicateIds",
    "nbgrader.preprocessors.OverwriteKernelspec",
    "attnlib.grading.nbgrader_plugins.OverwriteCells",
    "nbgrader.preprocessors.CheckCellMetadata",
]

# `nbgrader generate_feedback`: the hidden tests' code stays out of the feedback (test cells
# are shown as released; tracebacks do not quote the hidden lines), and the page loads nothing
# from the network (nbgrader's template loads MathJax from a CDN; this one leaves MathJax out,
# so math shows as TeX source).
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    "attnlib.grading.nbgrader_plugins.HideHiddenTests",
]
_attnlib = importlib.util.find_spec("attnlib")  # located, not imported (no torch for nbgrader)
_nbgrader = importlib.util.find_spec("nbgrader")
if _attnlib and _attnlib.submodule_search_locations and _nbgrader and _nbgrader.submodule_search_locations:
    c.HTMLExporter.template_name = "attnlib_feedback"  # attnlib/grading/templates/attnlib_feedback
    c.HTMLExporter.extra_template_basedirs = [
        os.path.join(list(_attnlib.submodule_search_locations)[0], "grading", "templates"),
        os.path.join(list(_nbgrader.submodule_search_locations)[0], "server_extensions", "formgrader", "templates"),
    ]

# SQLAlchemy 2 warns three times ("Object of type <SubmittedAssignment> not in session, add
# operation along 'Student.submissions' will not proceed", and the same for
# Assignment.submissions and Notebook.submissions) whenever nbgrader's
# Gradebook.add_submission creates a student's submission: nbgrader builds the objects before
# adding them to the session, and SQLAlchemy 2 no longer adds them along the relationships
# (its "cascade_backrefs" change). The add that follows stores them all; nothing is lost.
warnings.filterwarnings("ignore", message=r"Object of type <Submitted\w+> not in session, add operation along "
                        r"'\w+\.submissions' will not proceed")
