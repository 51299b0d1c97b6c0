//! moerge daemon library (being built in issue 6).
