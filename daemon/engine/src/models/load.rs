//! Reading a checkpoint's weights into the engine's own tensors, file by file, so a model is
//! resident once: each tensor is copied out of the file's map in the model's precision and
//! the map's pages behind it are released at once, so the peak is the model plus one
//! tensor rather than the model plus the whole mapped checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};

use crate::error::{EngineError, Result};

/// Every tensor of `files` (safetensors), converted to `dtype` on `device`.
pub(crate) fn read_weights(
    files: &[impl AsRef<Path>],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in files {
        let path = file.as_ref();
        let error = |message: String| EngineError::Config {
            path: path.to_path_buf(),
            message,
        };
        let f = std::fs::File::open(path).map_err(|e| error(format!("cannot open: {e}")))?;
        // SAFETY: the file is mapped read-only for the length of this loop iteration; every
        // tensor is copied out before the map is dropped (the library checked the header and
        // the values when it read the folder).
        let map = unsafe { Mmap::map(&f) }.map_err(|e| error(format!("cannot map: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| error(format!("not a safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            let tensor = view.load(device)?.to_dtype(dtype)?;
            let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
            // SAFETY: DontNeed on a read-only file mapping only drops our mapping of pages
            // whose bytes were just copied; touching them again would read the file anew.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, view.data().len())
            };
            out.insert(name, tensor);
        }
    }
    Ok(out)
}
