//! placeholder (module owned by a parallel work item)
