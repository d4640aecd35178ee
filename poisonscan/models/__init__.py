"""Encoders (timm backbones behind one interface) and safe checkpoint loading."""

from poisonscan.models.checkpoints import (convert_checkpoint, extract_state_dict, load_encoder, match_state_dict,
                                           read_checkpoint, read_encoder_metadata, save_encoder)
from poisonscan.models.encoders import (Encoder, create_encoder, default_image_size, is_known_arch, list_encoders,
                                        register_encoder)

__all__ = ["Encoder", "convert_checkpoint", "create_encoder", "default_image_size", "extract_state_dict",
           "is_known_arch", "list_encoders", "load_encoder", "match_state_dict", "read_checkpoint",
           "read_encoder_metadata", "register_encoder", "save_encoder"]
