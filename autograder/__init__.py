"""The autograder: grades a learner's lab notebook against `quantcourse.reference_impl`."""
