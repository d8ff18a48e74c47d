//! Opening an image chain for the commands that read guest data or
//! mappings (`map`, `compare`): the policy and the metadata check run
//! first, and only files named on the command line are opened.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_guard::convert;
use qcow2_guard::qemu_map::{MapLayer, Qcow2Layer};
use qcow2_guard::read::RawBacking;
use qcow2_guard::{check, CheckOptions, FileSource, Image, Limits, Policy};

use crate::exit::Exit;
use crate::report;

/// One layer of a chain.
pub enum Layer {
    Qcow2(Box<Image<FileSource>>),
    Raw(RawBacking<FileSource>),
}

/// A layer as `qemu-img map` sees it.
pub enum MapView<'a> {
    Qcow2(Qcow2Layer<'a, FileSource>),
    Raw(&'a RawBacking<FileSource>),
}

impl MapView<'_> {
    pub fn as_map(&self) -> &dyn MapLayer {
        match self {
            MapView::Qcow2(l) => l,
            MapView::Raw(r) => *r,
        }
    }
}

impl Layer {
    pub fn map_view(&self) -> MapView<'_> {
        match self {
            Layer::Qcow2(i) => MapView::Qcow2(Qcow2Layer::new(i)),
            Layer::Raw(r) => MapView::Raw(r),
        }
    }
}

/// Open a file given on the command line.
pub fn open_file(path: &Path, json: bool) -> Result<FileSource, Exit> {
    FileSource::open(path).map_err(|e| report::unreadable(path, &e, json))
}

/// Whether `src` starts with the qcow2 magic.
pub fn is_qcow2(src: &FileSource) -> bool {
    qcow2_guard::header::has_magic(src)
}

/// Open a qcow2 image, apply `policy` and the metadata check (as `check
/// --metadata-only`): error findings refuse it, with the findings on
/// stderr. `data_file` is attached when the image needs one.
pub fn open_qcow2(
    path: &Path,
    src: FileSource,
    policy: &Policy,
    limits: &Limits,
    data_file: Option<&Path>,
) -> Result<Image<FileSource>, Exit> {
    let mut image =
        Image::open_with(src, limits.clone()).map_err(|e| report::fatal(path, &e, false))?;
    // The data file before the check, which then also judges where the
    // clusters lie in it.
    if let Some(df) = data_file.filter(|_| image.header().has_data_file()) {
        image.set_data_file(Arc::new(open_file(df, false)?));
    }
    let rep = check(&image, &CheckOptions::metadata_only(policy.clone()));
    if !rep.verdict.passes() {
        return Err(report::audit_refusal(path, &rep));
    }
    if convert::data_file_rule(image.header(), data_file.is_some()).is_err() {
        return Err(if data_file.is_none() {
            errln!(
                "qcow2-guard: {}: guest data lives in an external data file; pass it with --data-file FILE",
                path.display()
            );
            Exit::Refused
        } else {
            errln!(
                "qcow2-guard: {}: --data-file given but the image has no external data file",
                path.display()
            );
            Exit::NotChecked
        });
    }
    Ok(image)
}

/// The top image, then each backing image given (qcow2 or raw, by magic),
/// each checked like the top; a backing image's own backing file is never
/// opened. Warns when the top names a backing file and none was given.
pub fn open_chain(
    path: &Path,
    policy: &Policy,
    limits: &Limits,
    data_file: Option<&Path>,
    backings: &[PathBuf],
) -> Result<Vec<Layer>, Exit> {
    let top = open_qcow2(path, open_file(path, false)?, policy, limits, data_file)?;
    if top.header().has_backing_file() && backings.is_empty() {
        errln!(
            "qcow2-guard: {}: no --backing given: unallocated ranges are shown as having no backing image",
            path.display()
        );
    }
    let mut chain = vec![Layer::Qcow2(Box::new(top))];
    for b in backings {
        let src = open_file(b, false)?;
        if is_qcow2(&src) {
            chain.push(Layer::Qcow2(Box::new(open_qcow2(
                b, src, policy, limits, None,
            )?)));
        } else {
            chain.push(Layer::Raw(RawBacking(src)));
        }
    }
    Ok(chain)
}
