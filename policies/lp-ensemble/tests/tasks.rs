//! Grouping per-record losses into per-task means.

use moerge_policy_lp_ensemble::tasks::{TaskIndex, UNTASKED};
use moerge_sdk::policy::Record;

fn record(task: Option<&str>) -> Record {
    Record {
        task: task.map(str::to_owned),
        prompt: String::new(),
        completion: String::new(),
    }
}

#[test]
fn tasks_are_sorted_untasked_first_and_averaged_per_task() {
    let tasks = [Some("b"), None, Some("a"), Some("b"), Some(UNTASKED), None];
    let records: Vec<Record> = tasks.iter().map(|t| record(*t)).collect();
    let index = TaskIndex::new(&records);
    // A task literally named "(untasked)" stays apart from records without a task.
    assert_eq!(index.names(), [UNTASKED, UNTASKED, "a", "b"]);
    let losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let means = index.means(&losses).unwrap();
    assert_eq!(means, [(2.0 + 6.0) / 2.0, 5.0, 3.0, (1.0 + 4.0) / 2.0]);
    assert_eq!(index.means(&losses[..5]), Err(5));
}
