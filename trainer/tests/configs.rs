//! Every training config shipped in `configs/` parses and validates (the
//! server's settings file excepted), so a recipe cannot rot unnoticed.

use handid_trainer::config::TrainConfig;

#[test]
fn shipped_training_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !name.ends_with(".yaml") || name == "server.yaml" {
            continue;
        }
        let config = TrainConfig::read(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(
            format!("{}.yaml", config.name),
            name,
            "a config's name is its file name"
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} training configs found");
}
