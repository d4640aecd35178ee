"""Encoders (timm backbones behind one interface) and safe checkpoint loading."""

from poisonscan.models.checkpoints import (BUILD_KWARGS, check_build_kwargs, convert_checkpoint, encoder_spec,
                                           extract_state_dict, load_encoder, match_state_dict, read_checkpoint,
                                           read_encoder_metadata, save_encoder)
from poisonscan.models.encoders import (Encoder, check_arch_name, create_encoder, default_image_size, is_known_arch,
                                        list_encoders, register_encoder)

__all__ = ["BUILD_KWARGS", "Encoder", "check_arch_name", "check_build_kwargs", "convert_checkpoint", "create_encoder",
           "default_image_size", "encoder_spec", "extract_state_dict", "is_known_arch", "list_encoders",
           "load_encoder", "match_state_dict", "read_checkpoint", "read_encoder_metadata", "register_encoder",
           "save_encoder"]
