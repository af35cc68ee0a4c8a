pub(crate) fn step(_s: &mut [super::ParamSlot<'_>], _c: &super::StepConstants) -> crate::Result<super::StepReport> {
    Err(crate::Error::Unsupported("wip".into()))
}
pub(crate) fn fisher_accumulate(_f: &mut crate::Tensor, _g: &crate::Tensor, _i: f32) -> crate::Result<()> {
    Err(crate::Error::Unsupported("wip".into()))
}
