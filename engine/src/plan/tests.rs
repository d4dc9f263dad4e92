use super::*;

use journal::{OpKind, StepDetail};

fn all_steps() -> Vec<Step> {
    vec![
        Step::Pause,
        Step::SaveMemory,
        Step::SnapshotDisk("xvda".into()),
        Step::Resume,
        Step::VerifyImage,
        Step::StopDomain,
        Step::RevertDisk("xvdb".into()),
        Step::DiscardImage("xvdb".into()),
        Step::RestoreMemory,
        Step::SetRunState,
        Step::DeleteDisk("snap-1.x".into(), "xvda".into()),
        Step::ReleaseImage("snap-1".into()),
        Step::Define,
        Step::SetWorkload("idle".into()),
        Step::Start,
        Step::Unpause,
        Step::Shutdown,
        Step::Destroy,
        Step::Undefine,
    ]
}

fn done(steps: &[Step]) -> Vec<(Step, StepDetail)> {
    steps
        .iter()
        .map(|s| (s.clone(), StepDetail::default()))
        .collect()
}

#[test]
fn step_names_round_trip() {
    for step in all_steps() {
        assert_eq!(Step::parse(&step.to_string()), Some(step.clone()));
        assert_eq!(
            Step::parse(&step.to_string()).map(|s| s.kind()),
            Some(step.kind())
        );
    }
    for bad in [
        "bogus",
        "delete-disk:nocolon",
        "snapshot-disk",
        "snapshot-disk:",
        "pause:x",
        "delete-disk::xvda",
        "",
    ] {
        assert_eq!(Step::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn an_unknown_step_is_corruption_naming_the_operation() {
    let events = vec![
        Event::StepBegun {
            op: 12,
            step: "save-memory".into(),
            at: 1,
        },
        Event::StepDone {
            op: 12,
            step: "snapshot-disk-v2:xvda".into(),
            at: 2,
            detail: StepDetail::default(),
        },
    ];
    match Progress::of(12, &events) {
        Err(Error::Corrupt { op: 12, what, .. }) => {
            assert!(what.contains("snapshot-disk-v2:xvda"), "{what}")
        }
        other => panic!("not corruption: {other:?}"),
    }
    // An unknown compensation too.
    let events = vec![Event::StepDone {
        op: 3,
        step: "undo:frobnicate".into(),
        at: 2,
        detail: StepDetail::default(),
    }];
    assert!(matches!(
        Progress::of(3, &events),
        Err(Error::Corrupt { op: 3, .. })
    ));
}

#[test]
fn progress_reads_failures_and_compensations() {
    let events = vec![
        Event::StepBegun {
            op: 1,
            step: "start".into(),
            at: 1,
        },
        Event::StepFailed {
            op: 1,
            step: "start".into(),
            at: 2,
            error: "boom".into(),
        },
        Event::StepDone {
            op: 1,
            step: "undo:save-memory".into(),
            at: 3,
            detail: StepDetail::default(),
        },
    ];
    let p = Progress::of(1, &events).unwrap_or_default();
    assert_eq!(p.begun, [Step::Start]);
    assert_eq!(p.failed, [Step::Start]);
    assert_eq!(p.undone, [Step::SaveMemory]);
    assert!(p.done.is_empty());
}

#[test]
fn create_rolls_forward_only_when_every_data_step_is_done() {
    let plan = vec![
        Step::SaveMemory,
        Step::SnapshotDisk("xvda".into()),
        Step::SnapshotDisk("xvdb".into()),
        Step::Resume,
    ];
    let mut p = Progress {
        done: done(&plan[..2]),
        ..Progress::default()
    };
    assert_eq!(decide(OpKind::Create, &plan, &p).0, Decision::Back);
    p.done = done(&plan[..3]);
    assert_eq!(decide(OpKind::Create, &plan, &p).0, Decision::Forward);
}

#[test]
fn revert_turns_forward_once_the_domain_is_stopped() {
    let plan = vec![Step::VerifyImage, Step::StopDomain, Step::RestoreMemory];
    let mut p = Progress {
        begun: vec![Step::VerifyImage],
        done: done(&[Step::VerifyImage]),
        ..Progress::default()
    };
    assert_eq!(decide(OpKind::Revert, &plan, &p).0, Decision::Back);
    p.begun.push(Step::StopDomain);
    assert_eq!(decide(OpKind::Revert, &plan, &p).0, Decision::Forward);
}

#[test]
fn delete_always_rolls_forward() {
    let plan = vec![Step::DeleteDisk("a".into(), "xvda".into())];
    let p = Progress::default();
    assert_eq!(decide(OpKind::Delete, &plan, &p).0, Decision::Forward);
}

#[test]
fn domain_commands_go_back_after_a_failure_and_forward_otherwise() {
    for kind in [
        OpKind::Define,
        OpKind::Start,
        OpKind::Pause,
        OpKind::Unpause,
        OpKind::Shutdown,
        OpKind::Destroy,
    ] {
        let step = match description(kind).steps().last().map(|r| r.step) {
            Some(StepKind::Define) => Step::Define,
            Some(StepKind::Start) => Step::Start,
            Some(StepKind::Pause) => Step::Pause,
            Some(StepKind::Unpause) => Step::Unpause,
            Some(StepKind::Shutdown) => Step::Shutdown,
            Some(StepKind::Destroy) => Step::Destroy,
            other => panic!("{kind:?}: {other:?}"),
        };
        let plan = vec![step.clone()];
        let mut p = Progress {
            begun: plan.clone(),
            ..Progress::default()
        };
        assert_eq!(decide(kind, &plan, &p).0, Decision::Forward, "{kind:?}");
        p.failed.push(step);
        assert_eq!(decide(kind, &plan, &p).0, Decision::Back, "{kind:?}");
    }
    let plan = vec![Step::Undefine, Step::ReleaseImage("s".into())];
    let mut p = Progress {
        begun: plan.clone(),
        failed: vec![Step::ReleaseImage("s".into())],
        ..Progress::default()
    };
    assert_eq!(decide(OpKind::Undefine, &plan, &p).0, Decision::Forward);
    p.failed = vec![Step::Undefine];
    assert_eq!(decide(OpKind::Undefine, &plan, &p).0, Decision::Back);
}

#[test]
fn every_kind_has_one_description_whose_steps_appear_once() {
    for kind in OpKind::ALL {
        let d = description(kind);
        assert_eq!(d.kind(), kind);
        let steps: Vec<StepKind> = d.steps().iter().map(|r| r.step).collect();
        let mut unique = steps.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), steps.len(), "{kind:?}: {steps:?}");
        assert!(!d.rules().is_empty(), "{kind:?} has no rules");
    }
}

#[test]
fn failpoints_are_listed_once_and_cover_every_step_boundary() {
    let all = failpoints();
    let mut names: Vec<&str> = all.iter().map(Failpoint::as_str).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "a failpoint is listed twice");
    for name in [
        "engine::create::after-begin",
        "engine::create::before-save-memory",
        "engine::create::save-memory-ingested",
        "engine::create::after-snapshot-disk",
        "engine::create::before-undo-snapshot-disk",
        "engine::create::before-commit",
        "engine::revert::after-stop-domain",
        "engine::revert::before-discard-image",
        "engine::delete::after-release-image",
        "engine::recover::after-decide",
        "engine::unpause::before-unpause",
        "engine::undefine::after-release-image",
        "engine::define::before-commit",
    ] {
        assert!(names.contains(&name), "{name} missing");
    }
    for kind in OpKind::ALL {
        if description(kind).journaled_at_once() {
            assert!(!all.contains(&Failpoint::after_begin(kind)), "{kind:?}");
            continue;
        }
        for rule in description(kind).steps() {
            let before = Failpoint::step(kind, Around::Before, rule.step);
            assert!(all.contains(&before), "{before}");
            let undo = Failpoint::step(kind, Around::BeforeUndo, rule.step);
            assert_eq!(all.contains(&undo), rule.undo.is_some(), "{undo}");
        }
    }
}

/// The tables in this module's doc and in the README are the rendered descriptions.
#[test]
fn the_documented_tables_are_the_descriptions() {
    let doc = |table: &str| -> String { table.lines().map(|l| format!("//! {l}\n")).collect() };
    let source = include_str!("../plan.rs");
    let readme = include_str!("../../../README.md");
    let steps = steps_table();
    let rules = rules_table();
    assert!(
        source.contains(&doc(&steps)),
        "plan.rs's step table differs from the descriptions; it should read:\n{}",
        doc(&steps)
    );
    assert!(
        source.contains(&doc(&rules)),
        "plan.rs's decision table differs from the descriptions; it should read:\n{}",
        doc(&rules)
    );
    assert!(
        readme.contains(&rules),
        "the README's recovery table differs from the descriptions; it should read:\n{rules}"
    );
}
