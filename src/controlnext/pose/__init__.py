"""Pose tools for pose-guided video: DWPose extraction (onnxruntime), drawing, and alignment to a reference body."""

from .align import ALIGN_BODY_POINTS, PoseAlignment, fit_pose_alignment
from .draw import draw_pose, draw_poses
from .dwpose import DWPOSE_FILES, DWPoseDetector, find_dwpose_files
from .extract import DrivingPoses, driving_poses
from .simcc import decode_simcc, wholebody_to_openpose
from .types import PoseFrame

__all__ = [
    "ALIGN_BODY_POINTS",
    "DWPOSE_FILES",
    "DWPoseDetector",
    "DrivingPoses",
    "PoseAlignment",
    "PoseFrame",
    "decode_simcc",
    "draw_pose",
    "draw_poses",
    "driving_poses",
    "find_dwpose_files",
    "fit_pose_alignment",
    "wholebody_to_openpose",
]
